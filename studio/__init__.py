"""App assembly: builds the Gradio Blocks from the tabs and an AppContext."""
