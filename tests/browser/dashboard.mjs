// The dashboard as a person uses it, in real headless Chromium: sign in, see the instance valid,
// the user revokes the app at the provider, watch the row turn to "needs re-authentication",
// click Reconnect, approve in the provider's popup, see it valid again. Saves a screenshot.
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
