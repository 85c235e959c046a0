"""tierplan.passes"""
