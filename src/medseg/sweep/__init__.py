"""``medseg sweep``: a settings search on Optuna over the configuration, trained and tuned by the other stages."""
