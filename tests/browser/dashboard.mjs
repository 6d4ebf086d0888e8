// The dashboard as a person uses it, in real headless Chromium: sign in, see the instance valid,
// the user revokes the app at the provider, watch the row turn to "needs re-authentication",
// click Reconnect, approve in the provider's popup, see it valid again. Saves a screenshot.
// On the way, with instances it creates through the API: an error stays after the next poll,
// focus and a text selection survive polls, a 190-character name overflows nothing (desktop
// and phone), bidirectional controls show escaped, a pending Reconnect stays disabled, the
// filter, the empty organization's hint and the stale banner of a service that does not answer.
//
// Usage: node dashboard.mjs <service url> <sandbox url> <org secret> <user secret> <instance id> <screenshot.png>
import { chromium } from "playwright-core";

const [service, sandbox, orgSecret, userSecret, instanceId, screenshot] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const step = (text) => console.log(`dashboard: ${text}`);

const browser = await chromium.launch({
  executablePath,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  await page.goto(`${service}/`);
  await page.fill("#org", orgSecret);
  await page.fill("#user", userSecret);
  await page.click("#signin-button");
  const row = (state) => page.locator(`tr[data-instance="${instanceId}"][data-state="${state}"]`);
  await row("valid").waitFor({ timeout: 15000 });
  step("signed in, the instance is valid");
  await page.locator('tr[data-connector="sandbox-box"]').waitFor({ timeout: 15000 });
  await page.selectOption("#category", "crm");
  // The filtered list replaces the whole one: the sandbox connectors go, CRM ones stay.
  await page.locator('tr[data-connector="sandbox-box"]').waitFor({ state: "detached", timeout: 15000 });
  if (await page.locator('tr[data-connector="salesforce"]').count() !== 1) throw new Error("the crm filter lost Salesforce");
  if (await page.locator('tr[data-connector="dropbox"]').count() !== 0) throw new Error("the crm filter kept a file-storage connector");
  step("the connector catalog filters by category");
  if (page.url().includes(orgSecret) || page.url().includes(userSecret)) throw new Error("a secret is in the URL");

  // The checks below each report and let the next run: one run lists every defect.
  const failures = [];
  const check = async (name, body) => {
    try { await body(); step(`ok: ${name}`); }
    catch (error) { failures.push(name); console.error(`dashboard: FAILED: ${name}: ${error.message}`); }
  };
  const expect = (condition, message) => { if (!condition) throw new Error(message); };
  const poll = () => page.waitForTimeout(2600); // more than one 2 s poll
  const api = `${service}/elements/api-v2`;
  const headers = { Authorization: `User ${userSecret}, Organization ${orgSecret}`, "Content-Type": "application/json" };
  const callback = `${service}/oauth/callback`;
  const createInstance = async (name, user) => {
    const query = new URLSearchParams({ apiKey: "it-client", apiSecret: "it-secret", callbackUrl: callback });
    const { oauthUrl } = await (await fetch(`${api}/elements/sandbox-adobe-sign/oauth/url?${query}`, { headers })).json();
    const approved = await fetch(`${oauthUrl}&login_hint=${user}`, { redirect: "manual" });
    const location = new URL(approved.headers.get("location"));
    const response = await fetch(`${api}/instances`, { method: "POST", headers, body: JSON.stringify({
      element: { key: "sandbox-adobe-sign" },
      providerData: { code: location.searchParams.get("code"), state: location.searchParams.get("state") },
      configuration: { "oauth.api.key": "it-client", "oauth.api.secret": "it-secret", "oauth.callback.url": callback }, name }) });
    if (!response.ok) throw new Error(`create ${name}: ${response.status} ${await response.text()}`);
    return String((await response.json()).id);
  };
  const rename = async (id, name) => {
    const response = await fetch(`${api}/instances/${id}`, { method: "PATCH", headers, body: JSON.stringify({ name }) });
    if (!response.ok) throw new Error(`rename: ${response.status}`);
  };
  const rowOf = (id) => page.locator(`tr[data-instance="${id}"]`);
  const button = (id, action) => page.locator(`tr[data-instance="${id}"] button[data-action=${action}]`);
  const longName = "L" + "o".repeat(188) + "g";
  const longId = await createInstance(longName, "bob");
  const bidiId = await createInstance("invoice\u202Efdp.exe", "carol");
  const arabic = "مريم — Мюллер 山田";
  const arabicId = await createInstance(arabic, "dave");
  for (const id of [longId, bidiId, arabicId]) await rowOf(id).waitFor({ timeout: 15000 });
  step("three more instances created through the API are listed");

  await check("item 3: a 190-character name keeps the page within the window (1280 px and 390 px)", async () => {
    for (const [width, height] of [[1280, 720], [390, 844]]) {
      await page.setViewportSize({ width, height });
      await page.waitForTimeout(200);
      const layout = await page.evaluate(() => ({
        inner: window.innerWidth, scroll: document.documentElement.scrollWidth,
        right: Math.max(...[...document.querySelectorAll("#rows button, #rows .state")].map((b) => b.getBoundingClientRect().right)),
      }));
      expect(layout.scroll <= layout.inner && layout.right <= layout.inner,
        `at ${width} px the page is ${layout.scroll} px wide, its buttons/states reach ${Math.round(layout.right)} px`);
    }
    await page.setViewportSize({ width: 1280, height: 720 });
  });

  await check("item 6: bidirectional controls show escaped, other scripts as they are", async () => {
    const bidi = await rowOf(bidiId).locator("td").first().innerText();
    expect(!bidi.includes("\u202E") && bidi.includes("\\u{202E}"), `the name shows as ${JSON.stringify(bidi)}`);
    const other = await rowOf(arabicId).locator("td").first().innerText();
    expect(other.includes(arabic), `the name shows as ${JSON.stringify(other)}`);
  });

  await check("item 2: focus stays on its button through polls, also when its row changes", async () => {
    await button(instanceId, "disable").focus();
    const focused = () => page.evaluate(() => {
      const a = document.activeElement;
      return `${a.tagName} ${a.closest("tr")?.dataset.instance} ${a.dataset.action}`;
    });
    const want = `BUTTON ${instanceId} disable`;
    await poll();
    expect(await focused() === want, `after a poll without change the focus is on ${await focused()}`);
    await rename(instanceId, "alice (renamed)");
    await rowOf(instanceId).filter({ hasText: "alice (renamed)" }).waitFor({ timeout: 5000 });
    expect(await focused() === want, `after a poll that redrew the row the focus is on ${await focused()}`);
  });

  await check("item 2: no redraw while a text selection in the table is held", async () => {
    await page.evaluate((id) => {
      const range = document.createRange();
      range.selectNodeContents(document.querySelector(`tr[data-instance="${id}"] strong`));
      window.getSelection().removeAllRanges(); window.getSelection().addRange(range);
    }, longId);
    await rename(longId, longName + "!");
    await poll();
    const selected = await page.evaluate(() => window.getSelection().toString());
    expect(selected.startsWith("Loo"), `the selection became ${JSON.stringify(selected.slice(0, 20))}`);
    await page.evaluate(() => window.getSelection().removeAllRanges());
    await rowOf(longId).filter({ hasText: longName + "!" }).waitFor({ timeout: 5000 });
  });

  const dismiss = async () => { if (await page.locator("#dismiss").isVisible()) await page.click("#dismiss"); };
  const [denied] = await Promise.all([page.waitForEvent("popup"), button(longId, "reconnect").click()]);
  await denied.waitForLoadState();
  await check("item 5: a pending Reconnect stays disabled, waiting for the provider, through polls", async () => {
    await poll();
    const label = await button(longId, "reconnect").innerText();
    expect(await button(longId, "reconnect").isDisabled() && /waiting/.test(label), `while pending the button is "${label}"`);
  });
  await check("item 1: Deny in the provider's window: the error stays after the next poll", async () => {
    await denied.click("button[value=deny]");
    await poll();
    const error = await page.locator("#board-error").innerText().catch(() => "");
    expect(await page.locator("#board-error").isVisible() && /Reconnect of .* failed: .*access_denied/.test(error),
      `after a poll the error line is "${error}"`);
    expect(await button(longId, "reconnect").isEnabled(), "the button stays disabled after the refusal");
  });
  await check("item 1: closing the provider's window: the error stays after the next poll", async () => {
    await dismiss();
    const [popup] = await Promise.all([page.waitForEvent("popup"), button(longId, "reconnect").click()]);
    await popup.waitForLoadState();
    await popup.close();
    await page.waitForTimeout(600); // the page looks for a closed window every 500 ms
    await poll();
    const error = await page.locator("#board-error").innerText().catch(() => "");
    expect(await page.locator("#board-error").isVisible() && /window was closed/.test(error), `after a poll the error line is "${error}"`);
    await dismiss();
  });

  await check("item 8: the filter narrows the rows", async () => {
    await page.fill("#filter", "invoice");
    await page.waitForTimeout(100);
    const shown = await page.locator("tr[data-instance]").evaluateAll((rows) => rows.map((r) => r.dataset.instance));
    expect(shown.length === 1 && shown[0] === bidiId, `the filter "invoice" shows ${shown}`);
    await page.fill("#filter", "");
  });

  const instancesList = (url) => url.pathname === "/elements/api-v2/instances";
  await check("item 7: an organization without instances shows a hint", async () => {
    const none = (route) => route.fulfill({ status: 200, contentType: "application/json", body: "[]" });
    await page.route(instancesList, none);
    try { await page.locator("#rows", { hasText: "No instances yet" }).waitFor({ timeout: 5000 }); }
    finally { await page.unroute(instancesList, none); }
    await rowOf(instanceId).waitFor({ timeout: 5000 });
  });

  await check("item 4: a service that does not answer: banner, stale table, Events says why", async () => {
    const down = (url) => url.pathname.startsWith("/elements/api-v2/");
    const abort = (route) => route.abort("connectionrefused");
    await page.route(down, abort);
    try {
      await page.locator("#offline", { hasText: "does not answer since" }).waitFor({ timeout: 5000 });
      expect(await page.locator("table.stale #rows").count() === 1, "the table is not marked stale");
      await button(instanceId, "events").click();
      await page.locator(`tr[data-events-for="${instanceId}"]`, { hasText: "does not answer" }).waitFor({ timeout: 5000 });
    } finally { await page.unroute(down, abort); }
    await page.locator("#offline").waitFor({ state: "hidden", timeout: 5000 });
    expect(await page.locator("table.stale").count() === 0, "the table stays stale after the service answered");
    await page.locator(`tr[data-events-for="${instanceId}"] li`).first().waitFor({ timeout: 5000 });
    await button(instanceId, "events").click();
  });
  if (failures.length) throw new Error(`${failures.length} check(s) failed: ${failures.join("; ")}`);

  const revoked = await fetch(`${sandbox}/__sandbox/users/alice/revoke`, { method: "POST" });
  if (!revoked.ok) throw new Error(`sandbox revoke answered ${revoked.status}`);
  // The service learns of it at its next refresh (a call, the scheduler, or this button-free nudge).
  await fetch(`${service}/elements/api-v2/instances/${instanceId}/tokens/refresh`, {
    method: "POST", headers: { Authorization: `User ${userSecret}, Organization ${orgSecret}` },
  });
  await row("needs_reauthentication").waitFor({ timeout: 15000 });
  step("after the user revoked the app at the provider, the row shows needs re-authentication (no reload)");

  const [popup] = await Promise.all([
    page.waitForEvent("popup"),
    page.locator(`tr[data-instance="${instanceId}"] button[data-action=reconnect]`).click(),
  ]);
  await popup.waitForLoadState();
  await popup.fill("input[name=login_hint]", "alice");
  await popup.click("button[value=approve]");
  await row("valid").waitFor({ timeout: 15000 });
  step("Reconnect: approved in the provider's popup, the instance is valid again");
  await page.screenshot({ path: screenshot, fullPage: true });
  step(`screenshot saved to ${screenshot}`);
} catch (error) {
  failed = true;
  console.error(`dashboard: FAILED: ${error.message}`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
