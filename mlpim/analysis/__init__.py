"""mlpim.analysis"""
