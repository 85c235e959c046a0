"""tierplan.planner"""
