"""Parallel plans across devices: data / tensor / pipeline degrees, ZeRO stage, micro-batch.

``profile`` measures a model once (per-layer FLOPs, bytes, activations), ``training`` and
``serving`` search the layouts on a cluster's cost model, ``search`` ranks them, ``whatif`` puts
machines side by side, and ``executor`` runs a chosen layout with torch.distributed.
"""
