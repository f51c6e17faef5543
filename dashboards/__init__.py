"""The ops dashboard's web page (`web/`) and the Grafana dashboards (`grafana/`): data files, packaged as
`rayfleet.dashboards` so that an installed ingress serves the page (`control_plane/serving/dashboard_api.py`)."""
