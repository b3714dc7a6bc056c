from instructdiff.run import cli

cli()
