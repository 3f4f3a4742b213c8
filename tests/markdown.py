"""Reading back the markdown tables the report writes (pandas' to_markdown pads its cells)."""


def table_rows(text):
    """Every row of every pipe table in `text` as a list of its stripped cells, header rows
    included and the |---| separator lines left out."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and set(line) - set("|-: "):
            rows.append([cell.strip() for cell in line.strip()[1:-1].split("|")])
    return rows
