from megassm.cli import entry

entry()
