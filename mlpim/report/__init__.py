"""mlpim.report"""
