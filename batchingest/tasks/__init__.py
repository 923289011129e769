"""Built-in tasks.

A built-in task runs through the same interface as a site's own task: its own process
(`python -m batchingest.tasks.<module>`), working directory the job folder, JOBPATH /
JOBNAME / JOBCONTROL in its environment, output to the job's LOG. An executable of the
same name in the tasks folder takes precedence, so a site can replace any of them.
"""

# task name -> module in this package
BUILTIN: dict[str, str] = {
    "stage": "stage",
    "transfer": "transfer",
}
