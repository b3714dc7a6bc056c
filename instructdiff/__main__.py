from instructdiff.run import main

main()
