"""Training streams and the loaders around them.

- base.py: the stream interface (``TrainStream``) and its one position type (``StreamPosition``);
- packing.py: documents' tokens cut into windows;
- text.py: ``TextStream``, tokenizing a text corpus's parts while training;
- tokens.py: ``TokenStream``, reading a prepared folder's token shards;
- loader.py: ``ResumableLoader`` (training, resumable) and ``FixedBatches`` (validation).
"""
