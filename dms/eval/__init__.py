"""Evaluation of KV-compression methods (vanilla, DMS, StreamingLLM, H2O, TOVA) on the
dms.tasks tasks: ``evaluate`` runs them, ``dms.eval.report`` prints, saves and plots;
``dms.eval.lm_eval`` adapts DMS models to lm-evaluation-harness."""
from dms.eval.report import plot, save_json, summary, table
from dms.eval.runner import METHODS, EvalConfig, Row, evaluate

__all__ = ["METHODS", "EvalConfig", "Row", "evaluate", "plot", "save_json", "summary", "table"]
