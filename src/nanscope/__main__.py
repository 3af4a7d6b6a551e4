from nanscope.cli.main import entry

entry()
