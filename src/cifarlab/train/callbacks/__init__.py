"""Everything the training loop does besides batches, forward, loss, backward, step and evaluate: one
module per feature, each a :class:`~cifarlab.train.loop.Callback`. :func:`cifarlab.train.run.callbacks_for`
chooses them from the recipe and the run options."""
