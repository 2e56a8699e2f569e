"""The annotation web app (`tia2 annotate serve`): a FastAPI server with server-rendered pages and
a small JSON API over tasks/annotate.py (app/annotation_server.py), and the page's vanilla script
and style (app/static/), which need no build step and no network."""
