from llmopt.cli.app import main

if __name__ == "__main__":  # not when a spawned child process (multiprocessing) imports this module
    main()
