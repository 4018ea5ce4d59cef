"""relat eval: every method side by side on JSONL benchmarks (knowledge, maths, multiple choice, code), scored the
way the papers score, through a server or in this process, with a Markdown report and plots."""
