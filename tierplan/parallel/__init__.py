"""Parallel plans across devices: data / tensor / pipeline degrees, ZeRO stage, micro-batch.

``profile`` measures a model once from a captured graph of a few layers and its architecture
(per-layer FLOPs, bytes, activations), ``training`` and ``serving`` search the layouts on a
cluster's cost model, ``search`` ranks them, ``whatif`` puts machines side by side, and
``executor`` runs a chosen layout with torch.distributed. Nothing here builds or captures a model:
the front end (``tierplan.profiling``) hands in a ``ModelProfile``.
"""
