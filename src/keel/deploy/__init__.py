"""Using what was trained, outside training:

* :mod:`keel.deploy.embed`: ``keel embed``, the embedding of every image of a folder or of shards,
  in chunks numpy and pandas open, resumable;
* :mod:`keel.deploy.search`: ``keel search``, nearest neighbours by cosine similarity over such an
  index;
* :mod:`keel.deploy.dedup`: ``keel dedup``, groups of near-duplicates and a list of files to drop;
* :mod:`keel.deploy.predict`: ``keel predict``, a fine-tuned classifier's top-k (or multi-label)
  predictions on new images, as a CSV;
* :mod:`keel.deploy.export`: ``keel export``, a backbone or classifier as ONNX or a torch.export
  program with a dynamic batch, checked against the eager model.
"""
