"""The training stage: the model factory, losses and metrics, and the Lightning engine (module, data module,
callbacks, fit) that ``medseg train`` runs.

Only :mod:`medseg.learn.module`, :mod:`medseg.learn.datamodule`, :mod:`medseg.learn.callbacks`, :mod:`medseg.learn.launch`,
:mod:`medseg.learn.fit` and :mod:`medseg.learn.train` import Lightning; inference imports the models and
metrics without it.
"""
