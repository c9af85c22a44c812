"""Training: the DPO losses (:mod:`.dpo`, torch only), the reference cache (:mod:`.reference`), the
tiny model and the demo. Imports :mod:`pairpack.batch`, :mod:`pairpack.read`, :mod:`pairpack.write`.
"""
