"""The answer-equivalence engine: extract a final answer from model output and decide whether it equals a
gold answer, without ever evaluating model output as code."""
