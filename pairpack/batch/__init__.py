"""Batching and serving: truncation and planning (:mod:`.plan`), epoch order (:mod:`.sampling`),
the batch type and its assembly (:mod:`.triplets`), the :class:`~.loader.Loader` and the CUDA
feeder (:mod:`.cuda`). Imports :mod:`pairpack.format` and :mod:`pairpack.read`; torch.
"""
