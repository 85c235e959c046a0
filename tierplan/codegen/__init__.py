"""tierplan.codegen"""
