"""Framework-free core of nanscope: results, vocabularies, rules, summaries, trends.

Design constraint: nothing under ``nanscope.core`` imports torch, tensorflow or keras, not
even to test a type. Adapters convert tensors to numpy and call in here.
"""
