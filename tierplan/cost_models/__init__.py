"""tierplan.cost_models"""
