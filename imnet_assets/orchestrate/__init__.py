"""Running stages through Dagster for `imnet build`: the build itself (build.py), the instance it
records into (instance.py), the Dagster 1.13 behaviours it works around (dagster_quirks.py) and
how it stops on Ctrl-C / SIGTERM (interrupts.py). The CLI only parses, calls these and prints."""
