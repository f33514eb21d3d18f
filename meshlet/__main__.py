from meshlet.cli import main

main()
