"""Evaluation of base vs fine-tuned models: metrics and the publish gate (pure), generation, the markdown report.

    loraflow.evaluation.metrics      fact accuracy, ROUGE-L, question selection, summaries, the gate, tables
    loraflow.evaluation.generation   greedy batched answers, stop ids, validation loss, loading for inference
    loraflow.evaluation.report       the evaluation report (markdown)

The evaluate stage (tasks/evaluate.py) is the recipe that chains them and writes the outputs.
"""
