"""Ingest: turning what users have (JSONL, .zst, Parquet; ids, strings, HH transcripts, chat) into
a dataset: sources, shapes, tokenization and the parallel ``build``. Imports :mod:`pairpack.format`
and :mod:`pairpack.write`; reading and training never import it.
"""
