"""The Prefect flows. Prefect reads its settings when it is first imported, so its defaults are set
here (`set_prefect_defaults`: state in the current folder, quiet offline), before the body of any
flows.* module imports it. (A deployment's flow run loads flows/x.py by path, in a process that has
imported prefect already: its settings are the worker's.)"""

from tia2.config import set_prefect_defaults

set_prefect_defaults()
