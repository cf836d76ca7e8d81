"""The report stage: held-out evaluation (``medseg evaluate``) and the self-contained HTML report with its
figures (``medseg report``).
"""
