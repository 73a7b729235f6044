"""Pass-level debugging: dumps, diffs, provenance, verify-each, bisect and the HTML report.

Everything here observes the pipeline through instruments (`compiler.pipeline.Instrument`)
or reruns it with a rewrite limit; no pass knows it is being debugged.
"""
