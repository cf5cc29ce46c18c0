"""Making inits: the method math (one pure function per method, registered in `methods.METHODS`),
the decompositions it needs, planning batches, and computing factors and residuals batch by batch.
Tensors in, tensors out: no files."""
