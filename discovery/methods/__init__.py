"""The methods: attribution (EAP, EAP-IG) and the patching searches (ACDC, minimisation), over the
engine. They return score tensors and circuit masks; the circuit object and runs are built above."""
