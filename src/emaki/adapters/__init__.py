"""Model adapters applied per request: LoRA, textual-inversion embeddings, hypernetworks.

Adapters never modify a loaded model in place. They produce clones that share every tensor they
do not change (:mod:`emaki.adapters.clone`), so the shared model other requests use is untouched
and "removing" an adapter is dropping the clone.
"""
