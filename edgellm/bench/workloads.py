"""The workloads of ``edgellm bench --speculative``: one chat prompt each, written for this project.

* ``code-edit``: a Python function of about fifty lines to be rewritten with one small change,
  the whole function in the reply -- most of the reply copies the prompt, which is where prompt
  lookup (``ngram``) pays;
* ``summarize``: a document of about five hundred words to be summarised with direct quotes --
  the quotes copy the prompt, the rest does not;
* ``chat``: open questions with nothing to copy -- speculation must cost (almost) nothing here.

Each prompt is rendered with the model's own chat template (a single user message) and the same
token ids go to every engine of the run.
"""

from __future__ import annotations

from edgellm.errors import InvalidParameterError

CODE_EDIT_FUNCTION = '''\
def merge_inventory(records, warehouse, min_quantity=0):
    """Merge stock records into a per-item summary for one warehouse.

    Each record is a dict with the keys "sku", "warehouse", "quantity",
    "unit_price" and "updated". Records of other warehouses are skipped.
    Returns a list of summaries sorted by SKU.
    """
    totals = {}
    prices = {}
    latest = {}
    skipped = 0
    for record in records:
        if record.get("warehouse") != warehouse:
            skipped += 1
            continue
        sku = record["sku"].strip().upper()
        quantity = int(record.get("quantity", 0))
        if quantity < 0:
            raise ValueError(f"negative quantity for {sku}: {quantity}")
        price = float(record.get("unit_price", 0.0))
        totals[sku] = totals.get(sku, 0) + quantity
        prices.setdefault(sku, []).append(price)
        stamp = record.get("updated")
        if stamp is not None and (sku not in latest or stamp > latest[sku]):
            latest[sku] = stamp

    summary = []
    for sku in sorted(totals):
        quantity = totals[sku]
        if quantity < min_quantity:
            continue
        item_prices = prices[sku]
        average = sum(item_prices) / len(item_prices)
        summary.append({
            "sku": sku,
            "quantity": quantity,
            "average_price": round(average, 2),
            "stock_value": round(quantity * average, 2),
            "last_update": latest.get(sku),
        })

    if skipped:
        print(f"merge_inventory: skipped {skipped} records of other warehouses")
    return summary
'''

CODE_EDIT = (
    "Here is a Python function:\n\n```python\n" + CODE_EDIT_FUNCTION + "```\n\n"
    "Change it so that it takes a new keyword argument `currency=\"EUR\"` and adds a \"currency\" key "
    "with that value to every summary dict. Keep everything else exactly as it is. Reply with the whole "
    "updated function in one Python code block and nothing else."
)

SUMMARIZE_DOCUMENT = """\
The Harbour Street Library Renovation: Report to the Town Council

In March the town council asked the library board to study whether the Harbour Street library, \
built in 1962, should be renovated or replaced. This report gives the board's findings.

The building itself is sound. Engineers who inspected it in April found that "the concrete frame \
and the foundations are in good condition and need no structural work for at least thirty years." \
The problems lie elsewhere. The roof leaks in two places over the reading room, the heating system \
is the original oil boiler, and the single entrance has six steps and no ramp, so that visitors in \
wheelchairs must ring a bell at the loading door and wait to be let in.

Use of the library has changed more than the building has. Loans of printed books fell by a fifth \
over the last ten years, while visits rose by a third. People come to study, to use the computers, \
to attend the homework club and the language classes, and to read newspapers in a warm room. The \
head librarian told the board that "on a winter afternoon every seat is taken by four o'clock, and \
we turn students away." The meeting room, which holds twenty people, is booked on four evenings out \
of five.

The board compared two options. The first is a renovation: a new roof, a heat pump in place of the \
boiler, a ramp and a lift, and the conversion of the closed stacks on the ground floor into a study \
room with forty seats. The architects estimate its cost at 2.4 million, and the library would close \
for about fourteen months. The second option is a new building on the car park behind the town hall, \
estimated at 6.1 million, with the old building sold. The library would stay open during \
construction, but the new site is a fifteen-minute walk further from the secondary school, whose \
pupils make up almost half of the afternoon visitors.

Residents were asked for their views in May. Of the 812 people who answered the survey, 64 percent \
preferred the renovation. Many wrote about the building's character; one reply read, "the tall \
windows and the wooden shelves are the reason my children like going there." Others worried about \
the long closure. A temporary reading room in the community centre could offer books for loan, \
twelve computers and the homework club, at a cost of 90,000 for the fourteen months.

The board recommends the renovation together with the temporary reading room. In the words of its \
chair, "we can give the town a library fit for the next fifty years for less than half the price of \
a new one, and keep it where the people who use it already are." The board asks the council to \
approve the budget in September, so that work can start after the summer holidays next year, when \
the fewest pupils need a place to study.
"""

SUMMARIZE = (
    "Read the following report.\n\n" + SUMMARIZE_DOCUMENT + "\n"
    "Summarise the report in about 150 words for a council member who has not read it. Quote at least "
    "three sentences from the report word for word, in quotation marks, to support the summary."
)

CHAT = (
    "I am moving to a small flat in a new city next month and I do not know anyone there. What are some "
    "practical ways to meet people and make friends as an adult? And how should I plan my first week so "
    "that the move feels less overwhelming?"
)

WORKLOADS: dict[str, dict] = {
    "code-edit": {"prompt": CODE_EDIT,
                  "about": "a 50-line Python function rewritten with a small change, the whole function in the reply"},
    "summarize": {"prompt": SUMMARIZE,
                  "about": "a report of about 500 words summarised with direct quotes"},
    "chat": {"prompt": CHAT, "about": "open chat questions, nothing in the prompt to copy"},
}


def get_workload(name: str) -> dict:
    if name not in WORKLOADS:
        raise InvalidParameterError(f"unknown workload {name!r}",
                                    "use --workload " + ", ".join(WORKLOADS))
    return WORKLOADS[name]
