"""mlpim.engine"""
