"""tierplan.report"""
