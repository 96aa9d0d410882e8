"""mlpim.tasks"""
