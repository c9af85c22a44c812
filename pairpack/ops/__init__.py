"""Operations on whole datasets, mirroring the CLI verbs: merge, export, archive (pack/unpack),
stats and show. Imports the layers below (format, read, write); never batch, train or cli.
"""
