"""The core layer: the types, contracts and helpers every stage package stands on.

It imports no other package of this project, and every other package may import it: the data
model (:mod:`core.types`), the component base and settings (:mod:`core.component`), errors,
the component registry, the index-record and lock-claim contracts (:mod:`core.records`,
:mod:`core.leases`), 64-bit digests and secret scrubbing.
"""
