"""The plan contract: what every solver produces and every consumer reads.

``plan`` holds the data (Plan, Step, Channel, Decision, the errors); ``validate`` replays a plan
with bookkeeping of its own and shares no code with the solvers it checks. (The package is
``plans``, not ``plan``: ``tierplan.plan`` is the public planning function.)
"""
