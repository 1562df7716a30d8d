"""The review of predicted masks: pictures of a scan under its mask (``render``), the verdicts a
person records (``verdicts``), the pages (``page``) and the local web server that shows them and
takes the verdicts (``server``). ``medseg.stages.review`` builds the review folder."""
