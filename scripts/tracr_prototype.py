"""Prototype for issue 20 (not used by the package yet): tracr's frac_prevs as a GPT-2 model, float64.

Construction: tracr's residual x (width d) is carried as r = [x, c, -x, -c, 0...] (width D = heads x
head_dim): every writer (embeddings, W_O, the MLP's output) writes +w and -w, every reader (q, k, v,
the MLP's input, the unembedding) reads the + half. LayerNorm's mean is then exactly 0, and with
gamma = c*sqrt(2/D), eps = 0, LN(r) = r (1 + |x|^2/c^2)^(-1/2): an identity up to |x|^2/(2c^2), plus
about c*2^-53 of rounding in the mean. ReLU MLPs; tracr's 1/sqrt(key_size) folded into W_Q
(scale_attn_weights off); untied unembedding reading tracr's residual labels.

Measured (340 inputs: every sequence of length 1-4 over {w, x, y, z} after BOS; tracr in float64):
the largest difference from tracr's final residual is 8.0e-6 at c = 1e3, 8.0e-8 at 1e4, 8.2e-10 at
1e5, 5.4e-10 at 1e6, 3.9e-9 at 1e7 (rounding takes over).

Needs tracr in its own venv (its jax/numpy/networkx match the lock's numpy 2.4.6, networkx 3.6.1):
    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install tracr-pypi torch==2.13.0 transformers==5.24.0
    /tmp/tv/bin/python scripts/tracr_prototype.py
"""
import itertools, math
import jax; jax.config.update("jax_enable_x64", True)
import numpy as np, torch
from tracr.compiler import compiling, lib
from tracr.rasp import rasp
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB, N = {"w", "x", "y", "z"}, 5
m = compiling.compile_rasp_to_model(lib.make_frac_prevs(rasp.tokens == "x"), vocab=VOCAB, max_seq_len=N,
                                    compiler_bos="BOS", causal=True)
cfg, P = m.model_config, {k: {kk: np.asarray(vv, dtype=np.float64) for kk, vv in v.items()} for k, v in m.params.items()}
d = P["token_embed"]["embeddings"].shape[1]; H, dk = cfg.num_heads, cfg.key_size; L = cfg.num_layers
head_dim = max(dk, math.ceil(2 * (d + 1) / H)); D = H * head_dim; c = 1e6
hid = cfg.mlp_hidden_size; V = max(P["token_embed"]["embeddings"].shape[0], d)
def mirror_out(w):  # writer [.., d] -> [.., D]: [w, 0, -w, 0, pad]
    out = np.zeros(w.shape[:-1] + (D,)); out[..., :d] = w; out[..., d + 1:2 * d + 1] = -w; return out
def read(w):  # reader [d, k] -> [D, k]
    out = np.zeros((D,) + w.shape[1:]); out[:d] = w; return out
conf = GPT2Config(n_layer=L, n_head=H, n_embd=D, n_inner=hid, n_positions=N + 1, vocab_size=V,
                  activation_function="relu", layer_norm_epsilon=0.0, scale_attn_weights=False, tie_word_embeddings=False,
                  attn_pdrop=0, resid_pdrop=0, embd_pdrop=0)
g = GPT2LMHeadModel(conf).double().eval()
sd = {}
wte = np.zeros((V, D)); wte[:P["token_embed"]["embeddings"].shape[0]] = mirror_out(P["token_embed"]["embeddings"]); wte[:, d] = c; wte[:, 2 * d + 1] = -c
sd["transformer.wte.weight"] = wte; sd["transformer.wpe.weight"] = mirror_out(P["pos_embed"]["embeddings"])
gamma = c * math.sqrt(2 / D)
def pad_heads(w, b):  # [d, H*dk] -> [D, H*head_dim]
    w2 = np.zeros((D, H, head_dim)); w2[:d, :, :dk] = w.reshape(d, H, dk); b2 = np.zeros((H, head_dim)); b2[:, :dk] = b.reshape(H, dk)
    return w2.reshape(D, D), b2.reshape(D)
for l in range(L):
    a = f"transformer/layer_{l}/attn/"; q, qb = pad_heads(P[a + "query"]["w"] / math.sqrt(dk), P[a + "query"]["b"] / math.sqrt(dk))
    k, kb = pad_heads(P[a + "key"]["w"], P[a + "key"]["b"]); v, vb = pad_heads(P[a + "value"]["w"], P[a + "value"]["b"])
    sd[f"transformer.h.{l}.attn.c_attn.weight"] = np.concatenate([q, k, v], 1); sd[f"transformer.h.{l}.attn.c_attn.bias"] = np.concatenate([qb, kb, vb])
    wo = np.zeros((H, head_dim, d)); wo[:, :dk] = P[a + "linear"]["w"].reshape(H, dk, d)
    sd[f"transformer.h.{l}.attn.c_proj.weight"] = mirror_out(wo.reshape(D, d)); sd[f"transformer.h.{l}.attn.c_proj.bias"] = mirror_out(P[a + "linear"]["b"])
    f = f"transformer/layer_{l}/mlp/"; w1 = np.zeros((d, hid)); b1 = np.zeros(hid); h1 = P[f + "linear_1"]["w"].shape[1]
    w1[:, :h1] = P[f + "linear_1"]["w"]; b1[:h1] = P[f + "linear_1"]["b"]; w2 = np.zeros((hid, d)); w2[:h1] = P[f + "linear_2"]["w"]
    sd[f"transformer.h.{l}.mlp.c_fc.weight"] = read(w1); sd[f"transformer.h.{l}.mlp.c_fc.bias"] = b1
    sd[f"transformer.h.{l}.mlp.c_proj.weight"] = mirror_out(w2); sd[f"transformer.h.{l}.mlp.c_proj.bias"] = mirror_out(P[f + "linear_2"]["b"])
    for ln in ("ln_1", "ln_2"):
        sd[f"transformer.h.{l}.{ln}.weight"] = np.full(D, gamma); sd[f"transformer.h.{l}.{ln}.bias"] = np.zeros(D)
sd["transformer.ln_f.weight"] = np.full(D, gamma); sd["transformer.ln_f.bias"] = np.zeros(D)
lm = np.zeros((V, D)); lm[:d, :d] = np.eye(d); sd["lm_head.weight"] = lm  # logits = the + half of the residual (tracr's labels)
missing = g.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=False)
print("missing", [k for k in missing.missing_keys if "attn.bias" not in k and "masked_bias" not in k])
enc = m.input_encoder; worst = 0.0; n = 0
for length in range(1, N):
    for seq in itertools.product(sorted(VOCAB), repeat=length):
        inp = ["BOS", *seq]; out = m.apply(inp); ref = np.asarray(out.transformer_output)[0]  # [pos, d] tracr's final residual
        with torch.no_grad():
            got = g(torch.tensor([enc.encode(inp)])).logits[0].numpy()
        worst = max(worst, float(np.abs(got[:, :d] - ref).max())); n += 1
print(f"{n} inputs; largest |GPT-2 - tracr| over the residual readout: {worst:.2e}; D={D}, head_dim={head_dim}, c={c:g}")
print(m.residual_labels)
