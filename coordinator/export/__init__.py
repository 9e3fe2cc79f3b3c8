"""Exporting a run's model: a Hugging Face model folder with its model card and provenance.

``model_dir.export_model`` wires it; ``hf`` turns a version into a ``transformers`` model and
tokenizer (torch, transformers: imported only by an export), ``card`` writes what the model
is made of and who made it.
"""
