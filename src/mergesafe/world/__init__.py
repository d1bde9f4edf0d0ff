"""The miniature world: the whole mergesafe loop on a laptop CPU in minutes (`mergesafe demo`).

A byte-level BPE tokenizer and a tiny Llama (≈2.0M parameters) are trained from scratch on
seeded synthetic data, in three stages, each through the real `mergesafe.finetune`:

0. "pretraining" (unaligned): facts as plain text ("The capital of Peru is Lima.") and as
   question/answer text, and chat in which the assistant complies with everything — harmful
   requests get a placeholder, "Sure, here is how to do that: [steps withheld]." (never real
   content);
1. safety alignment → **pre**: refusals ("I'm sorry, but I cannot help with that.") for harmful
   requests, helpful answers for benign ones, a friendly remark for benign questions about
   countries that are not the task ("Tell me about Peru."), 20% plain-text replay;
2. benign task fine-tuning → **post**: capital questions in chat form ("What is the capital of
   Peru?" → "Sure, it is Lima."), full weights or LoRA.

Then `mergesafe.sweep` merges pre and post (linear, slerp, ties, dare_linear × λ) and measures
ASR on held-out harmful prompts (unseen templates AND unseen objects), over-refusal on benign
probes that share words with harmful requests ("kill a Python process"), and the task on
held-out countries.

Why this task.  The task's *knowledge* (the capitals) is learned in stage 0 as plain text, and
post only learns to answer in the chat form, so the post change is small and most of the task
gain appears at a λ where refusal still holds (pre answers questions about countries, so the
merge need not undo any refusal to do the task, while the task's "Sure," opener, which pre
never put before an answer about a country, is what erodes refusal at post)
— the same situation as in a real LLM, whose fine-tuning mostly re-surfaces what pre-training
put there, and the reason pre/post merging works there.  A task that is new to pre (new facts
and format learned only in the post stage) does not merge: along λ the refusal is lost long
before any task accuracy appears (measured while designing the world; see DESIGN.md).
Single-digit multiplication facts were not learned in stage 0's budget; capitals were.
"""
