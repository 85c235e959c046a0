"""Where every tensor of one device's step lives over time: keep, recompute, swap, stream, offload.

The pieces, in the order a solve uses them: ``pricing`` (what the machine offers), ``candidates``
(the options read off the graph), ``linear_model`` (device bytes as a linear function of the
choices), ``cpsat`` (the CP-SAT model, built and read back in one place), ``local_search``,
``schedule`` (fates -> steps), ``retime`` (copies placed by their queues), ``simulate`` (the
replay that measures a schedule), ``assemble`` (a measured Plan), ``bound`` (the proven lower
bound), ``solve`` (the stages), with ``keep_all``, ``baselines`` and ``torch_baseline`` as the
plans it is compared against.
"""
