// The task page: shows the current item of the batch (the server's queue decides which: the next
// unanswered, so a reload resumes), takes the answer by keyboard or mouse, submits it, and undoes
// the last one. The next item's images load while the current one is shown.
"use strict";

(function () {
  const root = document.getElementById("annotate");
  if (!root) return;
  const batch = root.dataset.batch;
  const el = (id) => document.getElementById(id);
  const stage = el("stage");
  const controls = el("controls");

  const INSTRUCTIONS = {
    "rating": "Does the image match the text? Good, bad, or skip when you cannot tell.",
    "ranking": "Rank the images from best to worst: pick them in order; ties are allowed.",
    "pairwise": "Which image is better for the text, A or B? Or a tie.",
    "best-worst": "Pick the best image, then the worst.",
  };
  const ASPECTS = ["alignment", "fidelity", "harmlessness"];
  const ASPECT_NAMES = {alignment: "Alignment", fidelity: "Fidelity", harmlessness: "Harmlessness"};

  let current = null;   // the item shown: {item, task, prompt, images: [{image_id, url}], settings}
  let draft = null;     // the answer being made, per task
  let busy = false;     // a request is in flight: keys and clicks wait
  let preloaded = [];   // Image objects of the next items (kept so that they are not collected)

  // --- talking to the server ----------------------------------------------------------------
  async function call(path, body) {
    const options = {credentials: "same-origin", headers: {"Accept": "application/json"}};
    if (body !== undefined) {
      options.method = "POST";
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(`/api/batches/${encodeURIComponent(batch)}${path}`, options);
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = typeof data.detail === "string" ? data.detail : response.statusText;
      throw new Error(`${response.status}: ${detail}`);
    }
    return data;
  }

  async function guarded(work) {
    if (busy) return;
    busy = true;
    root.classList.add("busy");
    try {
      await work();
    } catch (error) {
      say(error.message, true);
    } finally {
      busy = false;
      root.classList.remove("busy");
    }
  }

  async function load() {
    const data = await call("/next?count=2");
    showProgress(data.done, data.total);
    preloaded = data.items.slice(1).flatMap((item) => item.images.map((image) => {
      const img = new Image();
      img.src = image.url;
      return img;
    }));
    show(data.items[0] || null);
  }

  function submit(answer) {
    const item = current.item;
    return guarded(async () => {
      const saved = await call("/answers", {item, answer});
      showProgress(saved.done, saved.total);
      say(saved.changed ? "Saved." : "Saved already: the same answer was stored.");
      await load();
    });
  }

  function undo() {
    return guarded(async () => {
      const undone = await call("/undo", {});
      showProgress(undone.done, undone.total);
      say(undone.item ? "Last answer undone: the item is back." : "Nothing to undo.");
      await load();
    });
  }

  // --- what the page shows ------------------------------------------------------------------
  function say(text, isError) {
    const status = el("status");
    status.textContent = text;
    status.classList.toggle("error", !!isError);
  }

  function showProgress(done, total) {
    const bar = el("progress");
    bar.max = Math.max(total, 1);
    bar.value = done;
    el("progress-text").textContent = `${done} / ${total}`;
  }

  function show(item) {
    current = item;
    root.dataset.item = item ? item.item : "";  // which item is shown (for scripts and tests)
    stage.replaceChildren();
    controls.replaceChildren();
    el("finished").hidden = item !== null;
    el("prompt").hidden = item === null;
    el("instruction").hidden = item === null;
    if (item === null) {
      el("keys-help").textContent = "";
      return;
    }
    el("prompt").textContent = item.prompt;
    el("instruction").textContent = item.settings.instruction || INSTRUCTIONS[item.task];
    TASKS[item.task].start(item);
    render();
  }

  function render() {
    if (current) TASKS[current.task].render(current);
  }

  function node(tag, attributes, ...children) {
    const element = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (name === "onclick") element.addEventListener("click", value);
      else if (name === "class") element.className = value;
      else if (value !== false && value !== null && value !== undefined) element.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) element.append(child);
    }
    return element;
  }

  function keyButton(key, label, onclick, extra) {
    return node("button", {type: "button", onclick: () => { if (!busy) onclick(); }, ...extra},
      node("kbd", {}, key), " ", label);
  }

  function picture(image, item) {
    return node("img", {src: image.url, alt: item.prompt, draggable: "false", "data-image-id": image.image_id});
  }

  // An image that is also a button (ranking, pairwise, best-worst): number, badge, click to pick.
  function imageButton(image, item, label, badge, onclick, selectedClass) {
    return node("button", {type: "button", class: `pick ${selectedClass || ""}`, "aria-label": label,
                           onclick: () => { if (!busy) onclick(); }},
      picture(image, item),
      node("span", {class: "number", "aria-hidden": "true"}, label.split(" ").pop()),
      badge ? node("span", {class: "badge"}, badge) : null);
  }

  function help(text) {
    el("keys-help").textContent = text;
  }

  // --- the four tasks: start (a fresh draft), render (from the draft), key (true if handled) ---
  const rating = {
    start(item) {
      draft = {aspects: item.settings.aspects ? Object.fromEntries(ASPECTS.map((a) => [a, null])) : null, focus: 0};
    },
    render(item) {
      stage.replaceChildren(node("figure", {class: "single"}, picture(item.images[0], item)));
      const rows = [];
      if (draft.aspects) {
        ASPECTS.forEach((aspect, index) => {
          const buttons = [1, 2, 3, 4, 5, 6, 7].map((value) => node("button", {
            type: "button", class: "scale", "aria-pressed": String(draft.aspects[aspect] === value),
            "aria-label": `${ASPECT_NAMES[aspect]} ${value}`,
            onclick: () => { draft.aspects[aspect] = value; draft.focus = index; render(); },
          }, String(value)));
          rows.push(node("fieldset", {class: `aspect ${draft.focus === index ? "focused" : ""}`, "data-aspect": aspect},
            node("legend", {}, ASPECT_NAMES[aspect]), ...buttons));
        });
      }
      controls.replaceChildren(
        ...(rows.length ? [node("div", {class: "aspects"}, ...rows)] : []),
        node("div", {class: "answers"},
          keyButton("G", "Good", () => rating.send("good"), {class: "good"}),
          keyButton("B", "Bad", () => rating.send("bad"), {class: "bad"}),
          keyButton("S", "Skip", () => rating.send("skip"), {class: "skip"})));
      help(draft.aspects ? "G good · B bad · S skip · 1–7 rate the highlighted aspect and move to the next · Tab skips one" :
                           "G good · B bad · S skip");
    },
    send(label) {
      const answer = {label};
      if (draft.aspects) {
        for (const [aspect, value] of Object.entries(draft.aspects)) if (value !== null) answer[aspect] = value;
      }
      submit(answer);
    },
    key(event) {
      const key = event.key.toLowerCase();
      if (key === "g") rating.send("good");
      else if (key === "b") rating.send("bad");
      else if (key === "s") rating.send("skip");
      else if (draft.aspects && /^[1-7]$/.test(event.key)) {
        draft.aspects[ASPECTS[draft.focus]] = Number(event.key);
        draft.focus = (draft.focus + 1) % ASPECTS.length;
        render();
      } else if (draft.aspects && event.key === "Tab") {
        draft.focus = (draft.focus + (event.shiftKey ? ASPECTS.length - 1 : 1)) % ASPECTS.length;
        render();
      } else return false;
      return true;
    },
  };

  const ranking = {
    start() {
      draft = {picks: [], tieNext: false};  // picks: [{image_id, rank}] best first
    },
    rankOf(imageId) {
      const pick = draft.picks.find((p) => p.image_id === imageId);
      return pick ? pick.rank : null;
    },
    render(item) {
      stage.replaceChildren(node("div", {class: `grid n${item.images.length}`}, ...item.images.map((image, index) =>
        imageButton(image, item, `Image ${index + 1}`,
          ranking.rankOf(image.image_id) ? `rank ${ranking.rankOf(image.image_id)}` : null,
          () => ranking.pick(index), ranking.rankOf(image.image_id) ? "picked" : ""))));
      const complete = draft.picks.length === item.images.length;
      const order = draft.picks.map((p) => `${p.rank}: image ${item.images.findIndex((i) => i.image_id === p.image_id) + 1}`);
      controls.replaceChildren(
        node("p", {class: "order", "aria-live": "polite"}, order.length ? `Order so far — ${order.join(", ")}` : "Pick the best image first."),
        node("div", {class: "answers"},
          keyButton("T", "Tie with previous", ranking.toggleTie, {"aria-pressed": String(draft.tieNext), class: "toggle"}),
          keyButton("⌫", "Remove last", ranking.removeLast, {class: "secondary", disabled: !draft.picks.length}),
          keyButton("Enter", "Submit", ranking.send, {class: "primary", disabled: !complete})));
      help(`1–${item.images.length} pick the next best · T tie the next pick with the previous · Backspace remove the last · Enter submit`);
    },
    pick(index) {
      const image = current.images[index];
      if (!image || ranking.rankOf(image.image_id)) return;
      const last = draft.picks[draft.picks.length - 1];
      const rank = !last ? 1 : draft.tieNext ? last.rank : last.rank + 1;
      draft.picks.push({image_id: image.image_id, rank});
      draft.tieNext = false;
      render();
    },
    toggleTie() {
      draft.tieNext = draft.picks.length > 0 && !draft.tieNext;
      if (!draft.picks.length) say("Pick an image first: a tie joins the next pick to the previous one.");
      render();
    },
    removeLast() {
      draft.picks.pop();
      draft.tieNext = false;
      render();
    },
    send() {
      if (draft.picks.length !== current.images.length) {
        say(`Rank every image first (${current.images.length - draft.picks.length} left).`, true);
        return;
      }
      submit({ranks: Object.fromEntries(draft.picks.map((p) => [p.image_id, p.rank]))});
    },
    key(event) {
      if (/^[1-9]$/.test(event.key)) ranking.pick(Number(event.key) - 1);
      else if (event.key.toLowerCase() === "t") ranking.toggleTie();
      else if (event.key === "Backspace") ranking.removeLast();
      else if (event.key === "Enter") ranking.send();
      else return false;
      return true;
    },
  };

  const pairwise = {
    start() {
      draft = {};
    },
    render(item) {
      const [a, b] = item.images;
      stage.replaceChildren(node("div", {class: "grid n2 pair"},
        imageButton(a, item, "Image A", null, () => submit({choice: "A"})),
        imageButton(b, item, "Image B", null, () => submit({choice: "B"}))));
      controls.replaceChildren(node("div", {class: "answers"},
        keyButton("A / ←", "A is better", () => submit({choice: "A"}), {class: "primary"}),
        keyButton("T / ↓", "Tie", () => submit({choice: "tie"}), {class: "skip"}),
        keyButton("B / →", "B is better", () => submit({choice: "B"}), {class: "primary"})));
      help("A or ← left is better · B or → right is better · T or ↓ tie");
    },
    key(event) {
      const key = event.key.toLowerCase();
      if (key === "a" || event.key === "ArrowLeft") submit({choice: "A"});
      else if (key === "b" || event.key === "ArrowRight") submit({choice: "B"});
      else if (key === "t" || event.key === "ArrowDown") submit({choice: "tie"});
      else return false;
      return true;
    },
  };

  const bestWorst = {
    start() {
      draft = {best: null, worst: null};  // indices into the item's images
    },
    render(item) {
      stage.replaceChildren(node("div", {class: `grid n${item.images.length}`}, ...item.images.map((image, index) => {
        const badge = index === draft.best ? "best" : index === draft.worst ? "worst" : null;
        return imageButton(image, item, `Image ${index + 1}`, badge, () => bestWorst.pick(index), badge || "");
      })));
      const describe = (index) => (index === null ? "–" : `image ${index + 1}`);
      controls.replaceChildren(
        node("p", {class: "order", "aria-live": "polite"}, `Best: ${describe(draft.best)} · Worst: ${describe(draft.worst)}`),
        node("div", {class: "answers"},
          keyButton("⌫", "Remove last", bestWorst.removeLast, {class: "secondary", disabled: draft.best === null}),
          keyButton("Enter", "Submit", bestWorst.send, {class: "primary", disabled: draft.worst === null})));
      help(`1–${item.images.length}: first the best, then the worst · Backspace remove the last · Enter submit`);
    },
    pick(index) {
      if (index >= current.images.length) return;
      if (draft.best === null) draft.best = index;
      else if (draft.worst === null && index !== draft.best) draft.worst = index;
      else if (index === draft.best) say("That one is the best already: pick a different image as the worst.", true);
      render();
    },
    removeLast() {
      if (draft.worst !== null) draft.worst = null;
      else draft.best = null;
      render();
    },
    send() {
      if (draft.best === null || draft.worst === null) {
        say("Pick the best image, then the worst, first.", true);
        return;
      }
      submit({best: current.images[draft.best].image_id, worst: current.images[draft.worst].image_id});
    },
    key(event) {
      if (/^[1-9]$/.test(event.key)) bestWorst.pick(Number(event.key) - 1);
      else if (event.key === "Backspace") bestWorst.removeLast();
      else if (event.key === "Enter") bestWorst.send();
      else return false;
      return true;
    },
  };

  const TASKS = {"rating": rating, "ranking": ranking, "pairwise": pairwise, "best-worst": bestWorst};

  // --- keys ---------------------------------------------------------------------------------
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.metaKey || event.isComposing) return;
    const undoKey = (event.ctrlKey && event.key.toLowerCase() === "z") || (!event.ctrlKey && event.key.toLowerCase() === "u");
    if (undoKey) {
      event.preventDefault();
      undo();
      return;
    }
    if (event.ctrlKey || !current || busy) return;
    // handled keys do only what they say here: Enter on a focused button does not click it too
    if (TASKS[current.task].key(event)) event.preventDefault();
  });
  el("undo").addEventListener("click", () => undo());

  guarded(load);
})();
