"""`stattn eval`: prompt sets, fidelity metrics, resumable data-parallel evaluation (docs/eval.md)."""
